//! Plain loops compiled twice: for the baseline target and for AVX2 + FMA, picked at run
//! time.
//!
//! The CPU reference's element-wise loops are written so the compiler vectorises them;
//! the default x86-64 target only allows 4-wide SSE. [`avx2_too!`] compiles the same body
//! a second time with AVX2 and FMA enabled (8 lanes) and calls that where the CPU has
//! both. Same source, same IEEE operations in the same order — the compiler never fuses a
//! multiply and an add on its own; a `mul_add` written in the source is one exactly
//! rounded operation either way (an instruction here, a library call in the baseline
//! build) — so the same bits.

/// `avx2_too! { /// docs
/// fn name(args) -> ret { body } }` defines `name`, running `body` compiled for AVX2
/// and FMA where the CPU has them, else for the baseline target.
macro_rules! avx2_too {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
            fn plain($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($a: $t),*) $(-> $r)? {
                plain($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { avx2($($a),*) };
            }
            plain($($a),*)
        }
    };
}

//! matmul (to be written)

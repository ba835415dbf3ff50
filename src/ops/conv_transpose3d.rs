//! conv_transpose3d (to be written)

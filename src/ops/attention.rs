//! attention (to be written)

//! norm (to be written)

//! pool3d (to be written)

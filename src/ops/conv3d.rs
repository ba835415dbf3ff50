//! conv3d (to be written)

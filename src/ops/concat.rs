//! concat (to be written)

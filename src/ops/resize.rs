//! resize (to be written)

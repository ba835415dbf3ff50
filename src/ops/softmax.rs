//! softmax (to be written)

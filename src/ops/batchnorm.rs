//! batchnorm (to be written)

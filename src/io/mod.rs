//! Volume, array and weight I/O.

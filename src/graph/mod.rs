//! graph executor

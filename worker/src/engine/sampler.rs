//! Token sampling (being written).

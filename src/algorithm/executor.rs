//! The executor (placeholder until written).

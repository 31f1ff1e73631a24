//! Godwit API types.

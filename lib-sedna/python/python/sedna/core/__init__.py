"""Sedna's `sedna.core` layout: the features' worker APIs, with Sedna's names and signatures,
backed by the Rust core."""

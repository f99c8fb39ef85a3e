"""Sedna's `sedna.common`: worker configuration (`config`) and the class registry
(`class_factory`)."""

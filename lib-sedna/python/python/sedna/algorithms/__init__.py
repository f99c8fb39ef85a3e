"""Sedna's `sedna.algorithms`: hard-example mining (`hard_example_mining`)."""

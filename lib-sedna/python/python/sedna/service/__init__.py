"""Sedna's `sedna.service`: the aggregation server (`server.AggregationServer`)."""

"""AGENTIC evaluation: scoring an attempt's output, behind one interface."""

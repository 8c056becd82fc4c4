"""Orchestration: the durable engine, the BASE workflow, admission, cancellation and watching."""

"""Domain vocabulary shared by every layer: enums, state machines and errors."""

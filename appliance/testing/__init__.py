"""Tools for testing the switch with hostile input (frame grammar, fuzzing helpers)."""

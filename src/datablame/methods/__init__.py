"""Methods: scoring rules over features. One file per method."""

"""Tree ensembles: one description (leaves, leaf values, bias, Newton statistics), read
through each library's own API; one file per library."""

"""Labels given by people: the labels contract (JSON), parsing of label files, the SQLite label store."""

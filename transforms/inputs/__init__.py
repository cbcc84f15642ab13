"""Reading inputs: tars, folders, URL lists, archives and label maps."""

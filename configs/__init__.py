"""Stage configs: `get_config(arg)` in each file returns an ml_collections.ConfigDict."""

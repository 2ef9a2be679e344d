"""s3prl upstream for this plugin's AudioEncoder (expert, hub entry) and s3prl compatibility shims."""

"""Where blob bytes live: local sharded files, and the optional S3 mirror target."""

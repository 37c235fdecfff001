"""Data preparation for q0: tokenisers and the commands that build token shards (.q0t)."""

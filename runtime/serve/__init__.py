"""`moestream serve`: an OpenAI-compatible HTTP server over a streamed pack, built on mlx-lm's server."""

"""What operators touch: settings, the OpenAI API, the Ray Serve app, metrics and the CLI."""

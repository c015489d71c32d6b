"""`nanoseek serve`: open models behind the OpenAI and Anthropic APIs (app.py has the routes)."""

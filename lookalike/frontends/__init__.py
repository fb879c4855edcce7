"""The front-ends, thin over the library: the typer CLI, the warm service (``Service``) and its FastAPI server and
standard-library client, the Streamlit explorer, and the quick start."""

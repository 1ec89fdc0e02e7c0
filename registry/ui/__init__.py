"""The web UI: server-rendered pages under /ui/ (Jinja2, our own CSS and a small script, every
asset served by this server), the third surface next to the REST API and the Hugging Face
protocol. Pages call the same service functions as the API and render the same models; actions
(alias moves, yanks, merges, cancels, tokens) go through the same permission rules.
"""

"""The run report: a self-contained HTML page (``html``) and its figures (``plots``)."""

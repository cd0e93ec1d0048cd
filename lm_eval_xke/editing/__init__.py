"""Code that more than one editor needs: tokenisation and fact-token positions, module hooks, context templates,
rewriting batches and their KV-cached forward, teacher-forced batches, hidden states, model-state guards, and the
in-context editors' prompt placement and memory. Plugins import from here and from their own family parent only."""

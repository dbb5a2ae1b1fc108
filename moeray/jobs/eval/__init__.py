"""Evaluation jobs: `spec` (what to evaluate on what), `tasks` (task files and scoring),
`backends` (a checkpoint in this process, or an OpenAI endpoint), `runner` (the job)."""

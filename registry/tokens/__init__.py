"""API tokens: create (the secret is shown once), list, revoke; the bootstrap admin token."""

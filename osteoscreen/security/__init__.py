"""Transport security shared by both protocols and the clients: TLS settings read from the environment and
checked before serving, certificate files that are re-read when cert-manager renews them, and the caller
allow-list (identities from client certificates). No serving or model code: servers adapt it."""

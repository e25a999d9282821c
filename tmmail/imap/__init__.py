"""IMAP4 service over the Maildir++ post office."""

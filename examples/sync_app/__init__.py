"""A small sync application: accounts and transfers, committing as real code does."""

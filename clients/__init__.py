"""The clients: a Flower ClientApp, its local training recipes and its defenses."""

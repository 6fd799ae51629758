"""The curious server: a Flower ServerApp whose strategy captures every client update."""

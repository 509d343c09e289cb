"""The desktop app's view layer (Qt Widgets): it draws state and forwards intents to app.services."""

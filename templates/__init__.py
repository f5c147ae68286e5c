"""Jinja2 templates the deploy renders (units); package data of llmhost.templates."""

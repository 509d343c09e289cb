"""The Chat view: chat list, header with the model picker, conversation, composer; and its controller."""

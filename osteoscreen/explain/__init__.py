"""Explanations of one screening result: TreeSHAP values of the Random Forest spread exactly over the
backbone's activation maps (`attribution`), drawn over the radiograph (`overlay`), checked against the
phantom's known anatomy (`faithfulness`). No TensorFlow here: the model layer computes the maps
(`osteoscreen.model.explainer`), the front and the CLI draw them."""

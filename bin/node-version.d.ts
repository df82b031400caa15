/** The problem with running on Node `version` (e.g. "v18.19.0"), or undefined when it is supported. */
export function nodeVersionProblem(version: string): string | undefined;

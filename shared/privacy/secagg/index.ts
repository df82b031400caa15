/** Secure aggregation (Bonawitz et al. 2017): see messages.ts for the protocol, client.ts and server.ts for the two sides. */
export { SecAggClient } from './client.ts';
export { SecAggServer, type SecAggServerOptions } from './server.ts';
export { quantizer, type Quantizer, type QuantizerConfig } from './quantize.ts';
export { wireBytes, type SecAggMessage } from './messages.ts';
export * as shamir from './shamir.ts';
export { neighboursOf, randomRing, type NeighbourGraph } from './graph.ts';

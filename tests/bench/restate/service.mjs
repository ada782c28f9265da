// The Restate side of the bench: a 3-step workflow of no-op steps. Each `ctx.run` is one durable
// step (its result is journaled by restate-server before the handler goes on), the same work as
// Baton's 3-step linear workflow of `echo` steps.

// The SDK needs Node 22 (`Promise.withResolvers`); polyfill it on Node 20.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function () {
    let resolve, reject;
    const promise = new this((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}

const restate = await import("@restatedev/restate-sdk");

const bench = restate.service({
  name: "bench",
  handlers: {
    three: async (ctx) => {
      const one = await ctx.run("one", async () => 1);
      const two = await ctx.run("two", async () => one + 1);
      const three = await ctx.run("three", async () => two + 1);
      return { result: three };
    },
  },
});

const port = Number(process.env.PORT ?? 9080);
restate.endpoint().bind(bench).listen(port);

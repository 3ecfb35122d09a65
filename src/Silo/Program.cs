using Microsoft.Extensions.Hosting;
using OrleansIdempotency.Silo.Hosting;

var builder = Host.CreateApplicationBuilder(args);
builder.UseOrleans(silo => silo.UseIdempotency(builder.Configuration));
await builder.Build().RunAsync();

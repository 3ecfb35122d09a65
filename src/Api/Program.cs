using OrleansIdempotency.Silo.Hosting;

var builder = WebApplication.CreateBuilder(args);
builder.AddIdempotencyCluster();
var app = builder.Build();
app.Run();

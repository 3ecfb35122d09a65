using Npgsql;

namespace OrleansIdempotency.Api.Demo;

/// <summary>Registers the demo API's services.</summary>
public static class DemoServiceCollectionExtensions
{
    /// <summary>
    /// API-key authentication (<c>Demo:ApiKeys</c>), controllers, and the demo store: PostgreSQL when
    /// <c>ConnectionStrings:Postgres</c> is set, in memory otherwise.
    /// </summary>
    public static IHostApplicationBuilder AddDemo(this IHostApplicationBuilder builder)
    {
        var services = builder.Services;
        services.AddAuthentication(ApiKeyAuthenticationOptions.Scheme)
            .AddScheme<ApiKeyAuthenticationOptions, ApiKeyAuthenticationHandler>(ApiKeyAuthenticationOptions.Scheme,
                options => builder.Configuration.GetSection("Demo:ApiKeys").Bind(options.Keys));
        services.AddAuthorization();
        services.AddProblemDetails();
        services.AddExceptionHandler<DemoStoreUnavailableHandler>();
        services.AddControllers();
        services.AddSingleton(TimeProvider.System);

        if (builder.Configuration.GetConnectionString("Postgres") is { Length: > 0 } postgres)
        {
            services.AddSingleton(_ => NpgsqlDataSource.Create(postgres));
            services.AddSingleton<PostgresDemoStore>();
            services.AddSingleton<IDemoStore>(sp => sp.GetRequiredService<PostgresDemoStore>());
            services.AddHostedService(sp => sp.GetRequiredService<PostgresDemoStore>());
        }
        else
        {
            services.AddSingleton<IDemoStore, InMemoryDemoStore>();
        }

        return builder;
    }
}
